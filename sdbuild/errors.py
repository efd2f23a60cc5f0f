"""User-facing errors: what the user asked for cannot be built, said in one clear message."""


class SpecError(ValueError):
    """A spec that cannot run here. Each problem names the option, what is wrong, what to use instead.

    Raised by validation before any weights load; the CLI prints it without a traceback and the
    sweep records it as an `unsupported` row.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(f"- {p}" for p in self.problems) if len(self.problems) > 1 else self.problems[0])


def problem(option: str, wrong: str, instead: str) -> str:
    """Format one problem the same way everywhere: `option: what is wrong. Use instead.`"""
    return f"{option}: {wrong}. {instead}"
