"""Projects (tenants): admin-managed; a project token sees its own."""
