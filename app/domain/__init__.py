"""Domain objects and their state machines: projects, tokens, certificates, orders,
accounts. Views and job handlers call these functions; they own the documents."""
