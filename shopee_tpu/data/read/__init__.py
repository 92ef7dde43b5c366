"""The reader: TFRecord shards -> tf.data batches (TensorFlow), any feature layout."""
