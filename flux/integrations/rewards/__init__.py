"""Rewards beyond the native signature: TRL's and verl's (styles.py) and rewards served over HTTP
(http.py: `reward_url`, `rewards: [{url: ...}]`)."""
