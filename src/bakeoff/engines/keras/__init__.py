"""The Keras 3 engine (TensorFlow or JAX backend): build (Keras applications and BiT with a new
head), fit (the epoch loop), trial (one trial end to end, saved models). Keras is imported only
through ``trial.import_keras``, which sets the backend first and imports torchvision before it."""

from bakeoff.engines.keras.build import count_params
from bakeoff.engines.keras.trial import load_predict, load_saved, run_trial

__all__ = ["run_trial", "load_saved", "load_predict", "count_params"]
