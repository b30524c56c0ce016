"""The processes of kvm@NAME.service: its ExecStart= (run) and the
long-lived supervisor (supervisor, with viewers, consolelog and the pure
stoppolicy), the short-lived children it forks (forkcall: startup makes the
guest's plan, attach the taps, scope and machine, recorder writes the
state database), and ExecStopPost= (stoppost)."""
