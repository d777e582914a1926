/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * The few kernel types the vpstag BPF program reads, instead of a full vmlinux.h.
 *
 * Only the fields used are declared. Every record is marked preserve_access_index, so clang
 * emits a CO-RE relocation for each field access and libbpf rewrites the offsets against the
 * running kernel's BTF (/sys/kernel/btf/vmlinux) at load time: the layout below need not match
 * any kernel, only the field names and kinds must exist there.
 */
#ifndef VPSTAG_VMLINUX_MIN_H
#define VPSTAG_VMLINUX_MIN_H

typedef signed char __s8;
typedef unsigned char __u8;
typedef short __s16;
typedef unsigned short __u16;
typedef int __s32;
typedef unsigned int __u32;
typedef long long __s64;
typedef unsigned long long __u64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef _Bool bool;
typedef int pid_t;

/* UAPI constants (include/uapi/linux/bpf.h); stable ABI. */
enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_RINGBUF = 27,
};

enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
	BPF_EXIST = 2,
};

/* Flags of bpf_ringbuf_submit() and queries of bpf_ringbuf_query(). */
enum {
	BPF_RB_NO_WAKEUP = 1,
	BPF_RB_FORCE_WAKEUP = 2,
};

enum {
	BPF_RB_AVAIL_DATA = 0,
	BPF_RB_RING_SIZE = 1,
	BPF_RB_CONS_POS = 2,
	BPF_RB_PROD_POS = 3,
};

/* include/linux/sched/signal.h: the whole thread group is exiting (exit_group, fatal signal). */
#define SIGNAL_GROUP_EXIT 0x00000004

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

typedef struct {
	int counter;
} atomic_t;

struct signal_struct {
	atomic_t live;		/* live threads of the group; 0 once the last one is in do_exit */
	unsigned int flags;	/* SIGNAL_GROUP_EXIT, ... */
	int group_exit_code;	/* wait status when SIGNAL_GROUP_EXIT is set */
	__u64 cutime;		/* ns: user time of the children waited for (and theirs) */
	__u64 cstime;		/* ns: their system time */
	unsigned long long sum_sched_runtime;	/* ns run by the group's released threads */
};

/* The scheduler's per-task entity; only the task's total run time. */
struct sched_entity {
	__u64 sum_exec_runtime;	/* ns this task has run, as of the scheduler's last update */
};

struct task_struct {
	pid_t pid;				/* thread id */
	pid_t tgid;				/* process id */
	int exit_code;				/* set in do_exit before sched_process_exit */
	__u64 start_boottime;			/* ns of CLOCK_BOOTTIME at creation */
	struct task_struct *real_parent;
	struct task_struct *group_leader;
	struct signal_struct *signal;
	struct sched_entity se;
};

#pragma clang attribute pop

#endif /* VPSTAG_VMLINUX_MIN_H */
