"""Plain functions between the routes and the tables: each takes a session and the tenant."""
