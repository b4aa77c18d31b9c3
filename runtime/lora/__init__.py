"""Many LoRA addons on one base model: adapter files, the served set, device slots, batched application."""
