"""chelsea-gguf: long-context GGUF inference on llama.cpp with online KV-cache clustering (Chelsea)."""

from chelsea_gguf.kv import KVStats
from chelsea_gguf.llama import Llama, Timings
from chelsea_gguf.models import ModelFetchError, default_model_path, gemma3_270m_path, smollm2_path

__all__ = ["Llama", "KVStats", "Timings", "ModelFetchError", "default_model_path", "smollm2_path",
           "gemma3_270m_path"]
__version__ = "0.1.0"
