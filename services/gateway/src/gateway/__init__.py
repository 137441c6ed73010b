"""The CRM gateway: the only public door. REST in, gRPC to the services out."""
