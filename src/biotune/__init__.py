"""biotune: evolutionary selective fine-tuning of pretrained image classifiers (BioTune)."""

__version__ = "0.1.0"
