"""Error classes: each names who is at fault; they are raised where the problem is known and
reported once, at the edge (the CLI)."""


class IpfixerError(Exception):
    """Root of every error ipfixer raises on purpose."""


class ConfigError(IpfixerError):
    """The user's config file is wrong (exit status 2 at the CLI)."""


class TemplateError(IpfixerError):
    """A template file is wrong: names the file, the template and the field."""


class InfoModelError(IpfixerError):
    """An information-element data file is wrong, or an element is unknown."""


class EncodeError(IpfixerError):
    """A value of ours does not fit the element or the message it is encoded into."""


class DecodeError(IpfixerError):
    """A peer's bytes are malformed: the only error the decoder raises."""


class KernelError(IpfixerError):
    """The kernel refused something: BPF load, qdisc/filter attach, map access."""


class TransportError(IpfixerError):
    """A collector cannot be reached or resolved."""
