"""TRL is the oracle of these tests; its experimental trainers (ORPO, CPO) warn on import."""

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
