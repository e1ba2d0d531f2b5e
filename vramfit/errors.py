"""Errors the user can act on. Each names what was wrong and what would work instead."""


class VramfitError(Exception):
    """Base class: the CLI prints the message and exits with status 2, without a traceback."""


class InputError(VramfitError):
    """Bad input (sizes, prompts, budgets, model names, files), found before any heavy work."""


class RecipeError(VramfitError):
    """A recipe string that does not parse, or a combination that cannot run (with a reason and an alternative)."""
