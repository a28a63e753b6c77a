"""Text-to-speech engines. `EspeakTts` is the built-in one; others implement `TtsEngine`."""

from media.tts.base import SingleFlight, TtsCache, TtsEngine, cache_key
from media.tts.espeak import ESPEAK_LANGUAGES, ESPEAK_VARIANTS, EspeakTts

__all__ = [
    "ESPEAK_LANGUAGES",
    "ESPEAK_VARIANTS",
    "EspeakTts",
    "SingleFlight",
    "TtsCache",
    "TtsEngine",
    "cache_key",
]
