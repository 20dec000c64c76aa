"""Development-only code: the embedded database launcher and the local stack supervisor
(``scripts/run``). Not installed with the runtime package and not in the image: it needs
secantusdb (GPL-2.0), a dev/test dependency."""
