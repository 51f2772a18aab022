"""The Keras network and what is done with it: ``make_model`` and the pretrained backbone, the device and
precision, scoring and plots, Grad-CAM, and the ONNX and LiteRT exports with their parity check."""
