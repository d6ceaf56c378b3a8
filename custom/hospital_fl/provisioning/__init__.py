"""Provisioning: the consortium's site configs -> FLARE project.yml -> signed startup kits."""
