"""Conversions between slm artifacts and other ecosystems (Hugging Face, GGUF/llama.cpp)."""
