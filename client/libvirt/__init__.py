"""xskbroker's libvirt hook, split by job (docs/libvirt.md):

- hook: the entry point libvirt runs (main), and what each hook call does
- metadata: the <xsk:interfaces> declaration in a domain's <metadata> (pure)
- config: /etc/xskbroker/libvirt.conf
- lifecycle: the detached worker's spawn and stop; forgetting a domain when it stops
- worker: plugging the declared interfaces into QEMU, recorded step by step
- agent: the child that asks the broker as QEMU's user and hands the fds back
- monitors: QEMU's monitor through virsh or a QMP socket, as hotplug's transport
- identity: who QEMU runs as, a process named by pid and start time, the drop to QEMU's user
- state: DOMAIN.json and DOMAIN.log in the state directory

Imports nothing from broker/: the only privilege here is the hook's own, shed before the broker is asked.
"""
