"""``{% signup_enabled as flag %}``: whether the sign-in page offers sign-up."""

from django import template

from webapp.accounts.views import signup_enabled as _signup_enabled

register = template.Library()


@register.simple_tag
def signup_enabled() -> bool:
    return _signup_enabled()
