"""bakeoff: which pretrained model should I fine-tune on my images?"""

from bakeoff.api import models, report, run
from bakeoff.errors import BakeoffError

__all__ = ["run", "report", "models", "BakeoffError"]
__version__ = "0.1.0"
