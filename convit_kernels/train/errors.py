"""The exception types the training command turns into one line on stderr and a non-zero exit."""


class TrainError(Exception):
    """Bad input (data, checkpoint, option, output folder): ``error: <message>``, exit code 2, no traceback.

    Raised alike by every process of a distributed run, so rank 0 alone reports it.
    """

    exit_code = 2
    rank_local = False


class UnreadableImage(TrainError):
    """An image of one process's shard: that process reports it (the others may never see it)."""

    rank_local = True


class Diverged(TrainError):
    """The loss became non-finite: training stops with exit code 1, keeping the checkpoint of the last good epoch."""

    exit_code = 1


class WriteFailed(TrainError):
    """Rank 0 could not write the output folder (a full disk, a lost mount): exit code 1, the last whole files kept."""

    exit_code = 1
    rank_local = True


def message_of(error: BaseException) -> str:
    """The user-facing line of a TrainError, also when a DataLoader worker re-raised it inside its traceback text."""
    text = str(error).strip()
    if "Original Traceback" in text:  # torch's ExceptionWrapper: the original message is the last line
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(f"{__name__}.") else last
    return text
