/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * What the BPF program and user space share: the layout of the tag map's values, of the
 * counters and of a ring-buffer record. src/decode.rs mirrors every offset here; keep them in
 * step (its unit tests pin the sizes and offsets).
 */
#ifndef VPSTAG_H
#define VPSTAG_H

/* Value of the `tags` hash map; the key is the tgid (__u32). */
struct vpstag_tag {
	__u64 vps;		/* VpsId */
	__u64 start_ns;		/* the process's start_boottime, ns of CLOCK_BOOTTIME */
	__u32 flags;		/* VPSTAG_TAG_* */
	__u32 pad;
};

/* A root: a process user space watches as such (a VPS's first process). Its exit is always
 * reported, at once; a child of a root does not inherit the bit. */
#define VPSTAG_TAG_ROOT 0x1

/* enum of struct vpstag_control.reporting */
enum vpstag_reporting {
	VPSTAG_REPORT_ALL = 0,		/* a record for every fork, exec and exit of a tagged process */
	VPSTAG_REPORT_ROOTS = 1,	/* records only for roots' exits and for losses */
};

/* The single value of the `control` array map, written by user space (all zero: report all,
 * wake the reader for every record, as the kernel's default does). */
struct vpstag_control {
	__u32 reporting;	/* enum vpstag_reporting */
	__u32 pad;
	__u64 wakeup_ns;	/* 0: default wake-ups (every record that finds the reader idle);
				   else at most one forced wake-up per this many ns, the other
				   records submitted with BPF_RB_NO_WAKEUP */
	__u64 wake_bytes;	/* with wakeup_ns: force a wake-up when this many bytes wait unread */
};

/* The single value of the `counters` array map: events the kernel side could not deliver. */
struct vpstag_counters {
	__u64 insert_failed;	/* a child of a tagged process could not be added to `tags` (map full) */
	__u64 ringbuf_full;	/* a notification was dropped: no room in the ring buffer */
};

enum vpstag_kind {
	VPSTAG_FORK = 1,
	VPSTAG_EXEC = 2,
	VPSTAG_EXIT = 3,
};

/* Fork: the child is not in the map (insertion failed); its tag is the parent's. */
#define VPSTAG_F_UNTRACKED 0x1
/* Exit: the process was a root (VPSTAG_TAG_ROOT). */
#define VPSTAG_F_ROOT 0x2
/* Exit: cpu_ns holds the process's CPU time. */
#define VPSTAG_F_CPU 0x4

/* One ring-buffer record, 64 bytes. */
struct vpstag_event {
	__u64 time_ns;		/* bpf_ktime_get_boot_ns() */
	__u64 vps;		/* the process's tag */
	__u64 start_ns;		/* fork: the child's start_boottime; otherwise 0 */
	__u32 kind;		/* enum vpstag_kind */
	__u32 cpu;		/* bpf_get_smp_processor_id() */
	__s32 pid;		/* fork: the parent (tgid of real_parent); exec, exit: the process */
	__s32 tid;		/* fork: the child's thread id; exec: the thread that called execve;
				   exit: the thread that exited last */
	__s32 child;		/* fork: the child's tgid; otherwise 0 */
	__s32 status;		/* exit: wait status; otherwise 0 */
	__u32 flags;		/* VPSTAG_F_* */
	__u32 pad;
	__u64 cpu_ns;		/* exit, with VPSTAG_F_CPU: ns of CPU the whole process used, its
				   threads' and its waited-for children's; otherwise 0 */
};

#endif /* VPSTAG_H */
