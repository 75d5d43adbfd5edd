"""The tensors of a generation batch: N sequences (B prompts x G completions, prompt-major), the
images each sequence shows, shared by its group, and what the step adds (advantages, the
sampling policy's and the reference's log-probs). The one place that knows the batch and vision
layout: micro-batches in which each sequence keeps its images, padding trimmed, the forward's
inputs. Shapes: see grpo.py."""

import dataclasses

import torch
import torch.nn.functional as F


def encoder_outputs(features):
    """Image features as the forward and generate take them instead of pixels (detail 12)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (
        BaseModelOutputWithDeepstackFeatures)

    layers = [tuple(f[i] for f in features) for i in range(features[0].shape[0])]
    return {"image": BaseModelOutputWithDeepstackFeatures(  # Qwen2-VL reads pooler_output only
        pooler_output=layers[0], deepstack_features=layers[1:] or None)}


@dataclasses.dataclass
class Rollout:
    """The tensors of a generation batch of N sequences, prompt-major."""
    prompt_ids: torch.Tensor         # (N, P) left-padded
    prompt_mask: torch.Tensor        # (N, P)
    mm_token_type_ids: torch.Tensor  # (N, P) 1 at image tokens
    images: list                     # per image of each sequence, its patches (p_i, D), shared
    image_grid_thw: torch.Tensor     # (images, 3) one row per image of each sequence
    images_per_seq: torch.Tensor     # (N,)
    completion_ids: torch.Tensor     # (N, C)
    completion_mask: torch.Tensor    # (N, C) up to and including the first EOS (grpo.py)
    image_features: list = None      # like `images`, (1 + L, tokens_i, H) of a frozen tower
    advantages: torch.Tensor = None  # (N,)
    old_logp: torch.Tensor = None    # (N, C) the sampling policy's, when num_iterations > 1
    ref_logp: torch.Tensor = None    # (N, C) the reference's, when beta != 0

    @classmethod
    def from_encoding(cls, enc, completion_ids, completion_mask, vision_start_id):
        return cls(enc["input_ids"], enc["attention_mask"], enc["mm_token_type_ids"],
                   enc["images"], enc["image_grid_thw"],
                   (enc["input_ids"] == vision_start_id).sum(1), completion_ids, completion_mask)

    @classmethod
    def concat(cls, parts, pad_id):
        """One Rollout of the sequences of generate's `parts` in order, as ONE call would have
        made it: prompts left-padded to the longest, completions right-padded with `pad_id` (as
        generate pads a finished sequence)."""
        def joined(name, value, left=False):
            width = max(getattr(r, name).shape[1] for r in parts)
            return torch.cat([F.pad(getattr(r, name), (width - getattr(r, name).shape[1], 0)
                                    if left else (0, width - getattr(r, name).shape[1]),
                                    value=value) for r in parts])
        features = [r.image_features for r in parts]  # each call's, or None (a trained tower)
        return cls(joined("prompt_ids", pad_id, True), joined("prompt_mask", 0, True),
                   joined("mm_token_type_ids", 0, True), [i for r in parts for i in r.images],
                   torch.cat([r.image_grid_thw for r in parts]),
                   torch.cat([r.images_per_seq for r in parts]),
                   joined("completion_ids", pad_id), None,
                   None if None in features else [f for part in features for f in part])

    def __len__(self):
        return self.prompt_ids.shape[0]

    def select(self, start, end):
        """Sequences [start, end) with the images that belong to them (detail 12)."""
        first, last = int(self.images_per_seq[:start].sum()), int(self.images_per_seq[:end].sum())
        rows = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        rows = {k: v[start:end] if v is not None else None for k, v in rows.items()}
        rows.update(images=self.images[first:last], image_grid_thw=self.image_grid_thw[first:last],
                    image_features=self.image_features and self.image_features[first:last])
        return Rollout(**rows)

    def trimmed(self):
        """The same sequences without the columns that are padding in every row."""
        first = int(self.prompt_mask.any(0).int().argmax())  # left padding shared by all rows
        last = int(self.completion_mask.any(0).nonzero().max()) + 1

        def cut(x):
            return x[:, :last] if x is not None else None
        return dataclasses.replace(
            self, prompt_ids=self.prompt_ids[:, first:], prompt_mask=self.prompt_mask[:, first:],
            mm_token_type_ids=self.mm_token_type_ids[:, first:],
            completion_ids=cut(self.completion_ids), completion_mask=cut(self.completion_mask),
            old_logp=cut(self.old_logp), ref_logp=cut(self.ref_logp))

    def micro_batches(self, size):
        """(start, micro-batch) for consecutive slices of `size` sequences, padding trimmed."""
        for start in range(0, len(self), size):
            yield start, self.select(start, min(start + size, len(self))).trimmed()

    def model_inputs(self, features=None):
        """Forward kwargs for prompt + completion, the images as their `features` or as pixels
        (detail 12); mm_token_type_ids zero over the completion, for M-RoPE's positions."""
        completion_types = torch.zeros_like(self.completion_ids)
        images = ({"mm_encoder_outputs": encoder_outputs(features)} if features is not None
                  else {"pixel_values": torch.cat(self.images)})
        return {"input_ids": torch.cat([self.prompt_ids, self.completion_ids], 1),       # (N, P+C)
                "attention_mask": torch.cat([self.prompt_mask, self.completion_mask], 1),
                "mm_token_type_ids": torch.cat([self.mm_token_type_ids, completion_types], 1),
                "image_grid_thw": self.image_grid_thw, **images}
