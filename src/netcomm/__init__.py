"""netcomm: object-storage exchange of updates between untrusting peers."""
