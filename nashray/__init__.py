"""nashray: online LLM alignment with general (non-Bradley-Terry) preferences on Ray.

The installed package is ``nashray``; its subpackages are the repository's top-level folders (pyproject's
``package-dir``):

    nashray.cluster    config, the campaign driver, CLI, KubeRay manifests        (cluster/)
    nashray.actors     generator and judge actors                                 (actors/)
    nashray.trainers   losses, pair building, the Ray Train + DeepSpeed learner   (trainers/)
    nashray.oracles    the preference oracles judges wrap: P(a ≻ b | x)           (oracles/)

and the pieces every role shares live here, in the package root: :mod:`nashray.layout` (the run directory and the
checkpoint layout), :mod:`nashray.models` (model loading) and :mod:`nashray.weights` (the weight-push format).
"""

from pathlib import Path

__version__ = "0.1.0"

# A source checkout on sys.path without an install (`ray job submit --working-dir .` ships one, and puts it ahead of
# the image's site-packages): this folder shadows the installed package, so its subpackages are found beside it, in
# the checkout's top-level folders. An installed nashray holds them inside this folder and needs no extra path.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "cluster" / "driver.py").is_file():
    __path__.append(str(_checkout))
