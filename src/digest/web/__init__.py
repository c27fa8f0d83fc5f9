"""The small server-rendered web app (unsubscribe, preferences, health)."""
