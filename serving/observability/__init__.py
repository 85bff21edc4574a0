"""Observability: every metric (`metrics`, defined once, bounded labels), drift against
training (`drift`), delayed labels and accuracy (`feedback`), and the latency-aware
autoscaling policy (`autoscale`) that Ray Serve's controller calls."""
