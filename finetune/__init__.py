"""finetune: the training engine. Fine-tune torchvision image classifiers on a labeled folder.

This package never imports the web stack; the service in ``app/`` drives it through callbacks.
"""

__version__ = "0.1.0"
