"""Safety before and after merging: the backdoor scan, purification, post-hoc defenses, merge protection."""
