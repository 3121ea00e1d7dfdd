"""The web service: Flask app, uploads, the classifier and its torch / ONNX backends."""
