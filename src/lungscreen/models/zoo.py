"""Importing this module registers every network of the zoo (each module registers itself on import).

``lungscreen.models`` imports it on first use of a name that needs the zoo (PEP 562), so the package stays
light: reading an inference spec or running an exported ONNX model never imports torch.
"""

from lungscreen.models import conv8, covidnet, densenet, resnets, squeezenet, unet  # noqa: F401
from lungscreen.models import multichexnet  # noqa: F401  (its encoder is a zoo model above)
