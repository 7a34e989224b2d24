"""pika's exceptions mapped to fedmq's: which failures are worth retrying and which are not.

Only the ``fedmq/broker/rabbitmq*`` modules import pika; nothing pika raises leaves them.
"""

from __future__ import annotations

import pika.exceptions as pex

from fedmq.errors import AccessRefused, BrokerConfigError


#: AMQP reply codes that mean "your request is wrong", not "try again later":
#: 403 ACCESS_REFUSED, 404 NOT_FOUND, 406 PRECONDITION_FAILED, 530 NOT_ALLOWED (unknown vhost).
CONFIG_REPLY_CODES = frozenset({403, 404, 406, 530})

#: Everything pika raises; nothing of it may leave the rabbitmq modules.
PIKA_ERRORS = (pex.AMQPError, pex.ChannelError, pex.ReentrancyError)


def reply_of(exc: BaseException) -> tuple[int | None, str]:
    """The AMQP reply code and text of a pika exception (code ``None`` when there is none)."""
    if isinstance(exc, (pex.ChannelClosed, pex.ConnectionClosed)):
        return exc.reply_code, exc.reply_text
    if isinstance(exc, (pex.ProbableAuthenticationError, pex.AuthenticationError)):
        return 403, f"authentication refused: {exc}"
    if isinstance(exc, pex.ProbableAccessDeniedError):
        return 530, f"access to the virtual host refused: {exc}"
    return None, f"{type(exc).__name__}: {exc}"


def config_error(exc: BaseException) -> BrokerConfigError | None:
    """The :class:`BrokerConfigError` for ``exc`` if retrying cannot help, else ``None``."""
    code, text = reply_of(exc)
    if code == 403:
        return AccessRefused(f"{code} {text}")
    if code in CONFIG_REPLY_CODES:
        return BrokerConfigError(f"{code} {text}")
    return None


def describe(exc: BaseException) -> str:
    code, text = reply_of(exc)
    return f"{code} {text}" if code is not None else text
