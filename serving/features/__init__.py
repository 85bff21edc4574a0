"""Online features: the spec a manifest declares (`spec`, with the one transformation
from raw fields plus stored features to model inputs), the request path's Redis store
(`store`, over the multiplexed connection in `resp`), and bulk loading (`materialize`)."""
