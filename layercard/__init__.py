"""layercard: which layers of a frozen LLM to LoRA-fine-tune (see README.md)."""
from layercard.card.layer_card import LayerCard
from layercard.profile.cost import predicted_cost
from layercard.profile.coupling import additivity_error, predicted_gain
from layercard.errors import LayercardError
from layercard.profile.profiler import profile_model

__all__ = ["LayerCard", "LayercardError", "additivity_error", "predicted_cost", "predicted_gain", "profile_model"]
__version__ = "0.1.0"
