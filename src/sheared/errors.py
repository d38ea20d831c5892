"""The one exception type for user mistakes.

Anything the user can fix (a bad path, an unsupported model, a config value out of range) raises
`UserError` with one line naming the bad value and what would be valid. The command line prints
that line and exits with code 2; internal invariants use `assert` instead.
"""


class UserError(ValueError):
    """A mistake in what the user asked for; the message is one line meant for them."""
