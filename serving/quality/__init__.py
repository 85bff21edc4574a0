"""Model quality over time: a durable log of predictions and labels in PostgreSQL
(predlog), its versioned schema (schema) and the queries that read it back: accuracy
over any window, training data exports (queries)."""
