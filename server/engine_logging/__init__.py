"""How vLLM's own processes log, under Airlock: ``logging.json`` (vLLM's ``VLLM_LOGGING_CONFIG_PATH``) and the
formatter it names, in a module that needs only the standard library, so that it also loads in an ``engine.python``
interpreter of its own (this directory alone goes on that interpreter's ``PYTHONPATH``)."""

from pathlib import Path

DIRECTORY = Path(__file__).parent
CONFIG = DIRECTORY / "logging.json"
