"""Click options that several commands share: one definition, one help text, one parser."""

from __future__ import annotations

import click

storage_option = click.option(
    "--storage-option",
    "storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="For s3://, gs://, az:// sources: an fsspec option (endpoint_url=..., anon=true, "
    "profile=...); repeatable. Credentials otherwise come from the store's usual places.",
)


def parse_pairs(pairs: tuple[str, ...], flag: str) -> tuple[tuple[str, str], ...]:
    """KEY=VALUE flags as pairs, or a usage error naming the one without '='."""
    parsed = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.UsageError(f"{flag} {pair!r}: write KEY=VALUE, e.g. endpoint_url=URL")
        parsed.append((key.strip(), value))
    return tuple(parsed)
