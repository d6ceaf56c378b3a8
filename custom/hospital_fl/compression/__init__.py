"""Update compression for thin uplinks (pure numpy; FLARE filters in hospital_fl.flare.filters)."""
