"""Self-distillation: KL between the student's and the frozen full-precision teacher's next-token
distributions at temperature T, on the tokens the loss covers (labels != -100)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def kl_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    num_items: Any = None,
) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T) per supervised position (logits predict labels[1:]): the mean, or the
    sum divided by `num_items` (the trainer's token count over the accumulated batch), like the CE."""
    import torch.nn.functional as F

    mask = labels[:, 1:] != -100
    s = student[:, :-1][mask].float() / temperature
    t = teacher[:, :-1][mask].float() / temperature
    if s.numel() == 0:
        return student.sum() * 0.0
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    denom = s.size(0) if num_items is None else num_items
    return kl * temperature**2 / (denom.to(kl.device) if hasattr(denom, "to") else denom)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: Any = None) -> torch.Tensor:
    """The usual shifted cross-entropy; summed and divided by `num_items` (tokens in the whole accumulated
    batch) when the trainer passes it, as the model's own loss would be."""
    import torch.nn.functional as F

    logits, target = logits[:, :-1].float(), labels[:, 1:]
    flat = logits.reshape(-1, logits.size(-1)), target.reshape(-1)
    if num_items is None:
        return F.cross_entropy(*flat, ignore_index=-100)
    total = F.cross_entropy(*flat, ignore_index=-100, reduction="sum")
    return total / (num_items.to(total.device) if hasattr(num_items, "to") else num_items)


class DistillLoss:
    """A Trainer `compute_loss_func`: (1 - weight) * CE + weight * KL against `teacher`. The student's inputs
    are captured by a forward pre-hook, so the teacher sees exactly the same batch."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, weight: float, temperature: float):
        self.teacher, self.weight, self.temperature = teacher, weight, temperature
        self.inputs: dict[str, Any] = {}
        student.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.inputs = {k: kwargs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in kwargs}

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        import torch

        logits = outputs["logits"]
        ce = causal_lm_loss(logits, labels, num_items_in_batch)
        if next(self.teacher.parameters()).device != logits.device:
            self.teacher.to(logits.device)
        with torch.no_grad():
            teacher_logits = self.teacher(**self.inputs).logits
        kl = kl_loss(logits, teacher_logits, labels, self.temperature, num_items_in_batch)
        return (1 - self.weight) * ce + self.weight * kl
