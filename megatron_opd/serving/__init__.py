"""SGLang servers (teacher and rollout fleets): launching and the HTTP client."""
