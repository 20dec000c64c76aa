"""Emergency and bulk renewals: start a tracked batch, read its progress, cancel it."""
