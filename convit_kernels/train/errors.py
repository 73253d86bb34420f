"""The one exception type the training command turns into a message and a non-zero exit."""


class TrainError(Exception):
    """Bad input (data, checkpoint, option): reported as ``error: <message>``, exit code 2, no traceback."""


def message_of(error: BaseException) -> str:
    """The user-facing line of a TrainError, also when a DataLoader worker re-raised it inside its traceback text."""
    text = str(error).strip()
    if "Original Traceback" in text:  # torch's ExceptionWrapper: the original message is the last line
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(f"{__name__}.TrainError") else last
    return text
