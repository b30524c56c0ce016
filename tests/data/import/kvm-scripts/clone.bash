#!/bin/bash
KERNEL=2.6.26-1-amd64
NAME=arkani
kvm -smp 2 \
-drive if=ide,file=/dev/internal/kvm_root,boot=on \
-m 1024 \
-daemonize \
-name ${NAME} \
-kernel /boot/vmlinuz-${KERNEL} \
-initrd /boot/initrd.img-${KERNEL} \
-append "root=/dev/hda ro"
