"""Pictures: detections drawn on images, training curves."""
