"""The writer: every source users have -> TFRecord shards, without TensorFlow."""
