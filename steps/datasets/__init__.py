"""Images on disk: the folder-per-class layout, splits, decoding and its cache (``data``), the default ELPV
set (``elpv``), and the tf.data training input (``batches``)."""
