"""Placeholder: this command is registered by its owning module."""


def register(app) -> None:
    return None
