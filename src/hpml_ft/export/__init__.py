"""Models out of hpml_ft: one GGUF file (llama.cpp, Ollama) and its Ollama Modelfile; `python -m hpml_ft.export`."""
