"""What users send (strings, image file bytes) → model input tensors; model outputs → answers.

Reads only the checkpoint folder's own files; docs/INPUTS.md says which and how. Pillow and tokenizers (the
``serve`` extra) are imported only when an image is decoded or a tokenizer.json is read.
"""

from edgeprism.inputs.heads import Classifier, Pooling, save_classifier
from edgeprism.inputs.image import ImagePreprocessor
from edgeprism.inputs.io import ModelIO, Task, load_io

__all__ = ["Classifier", "ImagePreprocessor", "ModelIO", "Pooling", "Task", "load_io", "save_classifier"]
