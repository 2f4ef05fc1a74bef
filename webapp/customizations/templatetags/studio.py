"""Small display helpers for the browser pages."""

from django import template

register = template.Library()

FORMAT_NAMES = {
    "chat": "OpenAI chat (messages)",
    "cot": "chain of thought (question, answer)",
    "prompt_completion": "prompt and completion",
}


@register.filter
def dataset_format(value: str) -> str:
    """The detected format's name as a person reads it."""
    return FORMAT_NAMES.get(value, value) if value else "not detected"
